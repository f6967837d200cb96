"""Experiments over the run engine (:mod:`.runs`: train or reuse, resume, record divergence): comparisons of
arms at their own learning rates (:mod:`.compare`), the same at several budgets (:mod:`.budgets`), scaling
curves over widths (:mod:`.scaling`), and the compression of trained models (:mod:`.compress`,
:mod:`.structure`). Each reads a suite (``kphi/suites/*.yaml``) and writes ``results.json``, a table and plots."""
