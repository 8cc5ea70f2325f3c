"""Issue 19 item 7: sample generation under FSDP2 keeps every rank stepping (`synced_gpus`).

Two real ranks over gloo shard a tiny Llama with torch's fully_shard (FSDP2, as accelerate does), so
every forward all-gathers the weights. Rank 0 is asked for 2 new tokens and rank 1 for 6, as when one
rank's prompts all reach EOS first: without synced_gpus rank 1 waits in an all-gather rank 0 never joins
(the collective times out); with distsft's decision both finish."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import helpers as h

SCRIPT = r'''
import datetime, json, os, sys, torch, torch.distributed as tdist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, GenerationConfig
from distsft.train.generation import synced_gpus
tdist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank = tdist.get_rank()
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
plain = synced_gpus(model)
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
sync = synced_gpus(model)
ids = torch.tensor([[1, 40, 41, 42]])
cfg = GenerationConfig(max_new_tokens=2 if rank == 0 else 6, do_sample=False, eos_token_id=None, pad_token_id=0)
with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg, synced_gpus=sync)
print("RESULT " + json.dumps({"rank": rank, "plain": plain, "sync": sync, "new": out.shape[1] - 4}), flush=True)
tdist.destroy_process_group()
'''


def test_generation_under_fsdp2_keeps_ranks_in_step(tmp_path):
    script = tmp_path / "gen.py"
    script.write_text(SCRIPT)
    with socket.socket() as sock:  # a free port: a fixed one collides with whatever else runs here
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(port), str(script), str(h.TINY)], capture_output=True, text=True, env=h.env(), timeout=240)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    # Both ranks print to one pipe: find each rank's object wherever it landed (lines may run together).
    results = sorted((json.loads(m) for m in re.findall(r"RESULT (\{[^{}]*\})", p.stdout)), key=lambda r: r["rank"])
    assert [r["plain"] for r in results] == [False, False]  # an unsharded model: no need (DDP replicas)
    assert [r["sync"] for r in results] == [True, True]
    assert [r["new"] for r in results] == [2, 6]
