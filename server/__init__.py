"""deltarelay: stream a language model's answer to browsers as it is written."""

__version__ = "0.1.0"
