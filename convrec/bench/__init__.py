"""``convrec bench encoder`` and the measurement helpers it needs.

Only what runs from an installed wheel lives here; the research harness (accuracy, scaling,
kernel benchmarks) is ``benchmarks/`` in the checkout, which imports these helpers.
"""
