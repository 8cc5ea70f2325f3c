"""What every rank runs (`python -m distsft.train RUN_DIR/run.yaml`): the recipe as named phases, the
training arguments and backend settings, the SFTTrainer subclass, model + PEFT + new tokens, FSDP2,
eval loss, generation, diagnostics. Importing the package imports nothing heavy: the launcher renders
with train.backend and train.fsdp without torch."""
