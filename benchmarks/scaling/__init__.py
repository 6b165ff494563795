"""CPU-scale reproduction of the large-batch claims of LAMB and LARS (issue 5): a batch ladder on real data.

Two tasks (Fashion-MNIST with a deep narrow CNN, masked-language modelling on Wikipedia lead paragraphs with a
small BERT), four optimizers (LAMB, LARS, AdamW, SGD with momentum), a fixed epoch budget, and two protocols:
(A) the lr tuned once at the smallest batch and scaled by rule, (B) the lr tuned at every batch size.

    python -m benchmarks.scaling.experiment --quick     # minutes
    python -m benchmarks.scaling.experiment             # the full ladder (see --help for the estimate)

Modules: ``data`` (loaders), ``models``, ``protocol`` (grids, scaling rules, the run plan: pure functions),
``train`` (one run), ``report`` (table, plots, W&B), ``experiment`` (the CLI).
"""
