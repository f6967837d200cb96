"""Measurement tools that no training path needs: ``kphi bench`` (:mod:`.bench`: the block against dense layers
and its FLOP count) and every formulation of the block, eager and compiled (:mod:`.bench_formulations`)."""
