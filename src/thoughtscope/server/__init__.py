"""The local web workbench (`thoughtscope serve`): feature explorer, analyzer, equalizer and NLA view over the
library."""

from .app import create_app
from .config import ServerConfig
from .workbench import LoadStatus, Workbench, load_workbench

__all__ = ["LoadStatus", "ServerConfig", "Workbench", "create_app", "load_workbench"]
