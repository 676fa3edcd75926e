from .console import quiet_third_party as _quiet_third_party

_quiet_third_party()   # a few third-party notes that read as trouble, by their exact words (console.py)
