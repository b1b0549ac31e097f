"""The one error type users can cause, carrying where it happened."""
from __future__ import annotations


class ResnetcError(Exception):
    """An error in the user's input (a spec, a weights file, a data source, a flag).

    ``str(err)`` is one line: ``FILE:LINE[:COL]: layer 'NAME' (TYPE): message``, with the parts that are
    known. The CLI prints it alone and exits 2; nothing else should ever reach the user as a traceback.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 col: int | None = None, layer: str | None = None, layer_type: str | None = None):
        self.message = message
        self.file = file
        self.line = line
        self.col = col
        self.layer = layer
        self.layer_type = layer_type
        super().__init__(self.format())

    def format(self) -> str:
        where = ""
        if self.file:
            where = self.file
            if self.line:
                where += f":{self.line}"
                if self.col:
                    where += f":{self.col}"
            where += ": "
        who = ""
        if self.layer is not None:
            who = f"layer '{self.layer}'"
            if self.layer_type:
                who += f" ({self.layer_type})"
            who += ": "
        return f"{where}{who}{self.message}".replace("\n", " ")

    def __str__(self) -> str:
        return self.format()

    def at(self, *, file=None, line=None, layer=None, layer_type=None) -> "ResnetcError":
        """Fill in location fields that are still unknown; returns self (for ``raise err.at(...)``)."""
        self.file = self.file or file
        self.line = self.line or line
        if self.layer is None:
            self.layer = layer
        self.layer_type = self.layer_type or layer_type
        self.args = (self.format(),)
        return self
