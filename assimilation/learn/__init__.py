"""The learning layer: unrolled and learned assimilation, model-error learning,
bilevel calibration and structured priors.

It builds on the DA maths of :mod:`assimilation` (costs, controls, methods) and
takes pytrees, never files: it imports neither :mod:`assimilation.io`,
:mod:`assimilation.runs`, the command line nor xarray (``tests/test_layering.py``
checks it).
"""
