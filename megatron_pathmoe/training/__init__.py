"""Pretraining on megatron-core, the top of the engine (above ``checkpoint/`` and ``runtime/``):

- ``arguments``: the Megatron-LM-style command line, parsed into ``PathMoEConfig`` and
  ``TrainingConfig`` and checked before any process group exists;
- ``build``: model chunks in megatron DDP, optimizer, LR scheduler, data iterators;
- ``step``: one training step and one validation pass (one forward/backward helper);
- ``trainer``: the run (``Trainer.setup / train_step / evaluate / train``);
- ``metrics``: the metrics window every scalar flows through (loss, aux losses, expert load,
  routing entropy, tokens/s); ``summary``: the run summary built from it;
- ``faults``: the non-finite guard and fault injection;
- ``cli``: ``pathmoe-pretrain`` (``python -m megatron_pathmoe.training.pretrain``).
"""
