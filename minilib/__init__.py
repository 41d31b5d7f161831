"""minilib: fastai's "Deep Learning from the Foundations" (2019, lesson 9) rebuilt, one module per idea.

Import from the modules by their lesson names, e.g. ``from minilib.loss import log_softmax``.
The reading guide in README.md maps each notebook to its module and its spec test file.
"""

__version__ = "0.1.0"
