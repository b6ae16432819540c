"""ADOPT kernels, one module per backend; all take the same arguments (see :mod:`adoptim.functional`)."""
