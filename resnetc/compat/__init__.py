"""Compatibility layers for existing Caffe code: ``from resnetc.compat import caffe`` is pycaffe."""
