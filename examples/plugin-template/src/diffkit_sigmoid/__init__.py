"""A diffkit plugin: the ``sigmoid`` noise schedule and the ``reverse-sde`` sampler.

Installed, it is found through its entry point in the group ``diffkit``; a spec then
says ``schedule: {type: sigmoid}`` and ``sampler: {type: reverse-sde}``.
"""

__version__ = "0.2.0"
