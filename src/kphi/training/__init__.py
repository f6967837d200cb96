"""What a training run is made of, around transformers' ``Trainer``: its settings and identity
(:mod:`.train_settings`, light to import: the command line builds its flags from them), callbacks (progress,
checkpoints marked complete, time limits), per-group learning rates (:mod:`.optim`), the distillation loss
(:mod:`.distill`), LoRA through PEFT (:mod:`.lora`), FSDP/DeepSpeed state (:mod:`.sharding`) and the accelerate
launch files (:mod:`.launch_configs`). :mod:`kphi.train` runs them."""
