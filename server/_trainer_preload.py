"""Imported once by the trainer processes' fork server (server/trainer.py), never by the service:
torch, the model and torch's lazy start-up (the first optimizer step imports torch._dynamo, about
1.5 s) are paid there once, and every trainer process forked from it starts warm."""
import torch

from .fusion import warm_up
from .trainer import freeze_start_up

torch.set_num_threads(1)  # before any op: no intra-op thread pool exists when the server forks
warm_up()
freeze_start_up()  # then each trainer forked from here does not walk these objects again (about 130 ms)
