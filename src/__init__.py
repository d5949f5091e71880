"""voxcore: the low-latency core of real-time voice agents.

The import package is ``voxcore`` (this folder, ``src/``, is mapped onto it). A host service normally
needs only :class:`voxcore.entrypoints.container.Container`; see the README.
"""

__version__ = "0.1.0"
