"""Per-rank entry point: `accelerate launch --config_file RUN_DIR/accelerate.yaml launch/train.py RUN_DIR/run.yaml`
(or torchrun). Everything lives in distsft.train (train.recipe); this file only exists so users can launch by path."""

from distsft.train.recipe import main

if __name__ == "__main__":
    main()
