"""`python -m distsft.train RUN_DIR/run.yaml`: the per-rank entry that `distsft run` launches,
importable from an installed package (launch/train.py is the same for users who launch by path)."""

from distsft.train.recipe import main

if __name__ == "__main__":
    main()
