"""The switches of a config file: --config=configs/X.py:runlocal,name=value,..."""
import ml_collections

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """The comma-separated switches of `arg`, typed by their defaults.

    Every switch is declared by its default (a bool, int, float or str): `name=value` is
    read as that type, and a bare `name` sets a bool switch to True. An undeclared switch
    is an error, so "norunlocal" or a misspelt name is never taken for another.

      parse_arg("runlocal,res=64", runlocal=False, res=224)  # runlocal=True, res=64
    """
    for name, default in defaults.items():
        if type(default) not in (bool, int, float, str):
            raise TypeError(f"config switch {name!r}: default {default!r} is not a bool, int, "
                            "float or str")
    args = ml_collections.ConfigDict(defaults)
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        name, has_value, text = (part.strip() for part in item.partition("="))
        if name not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise ValueError(f"config switch {name!r}: no such switch (known: {known})")
        kind = type(defaults[name])
        if not has_value:
            if kind is not bool:
                raise ValueError(f"config switch {name!r} needs a value: {name}=<{kind.__name__}>")
            args[name] = True
        elif kind is bool:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError(f"config switch {name}={text!r}: not a bool")
            args[name] = text.lower() in _TRUE
        else:
            try:
                args[name] = kind(text)
            except ValueError:
                raise ValueError(f"config switch {name}={text!r}: not a {kind.__name__}") from None
    return args
