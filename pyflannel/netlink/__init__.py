"""rtnetlink for pyflannel (being split into modules: everything lives in .codec for now)."""

from .codec import *  # noqa: F403
