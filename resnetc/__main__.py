"""``python -m resnetc ...`` (also the entry of ``torchrun ... -m resnetc train ...`` and of the ranks that
``resnetc train --gpu 0,1`` / ``--nproc N`` starts)."""
from .cli import main

if __name__ == "__main__":
    main(prog_name="resnetc")
