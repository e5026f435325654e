"""`decoderlab lab MODEL`: a local web page to look inside a model (tokens, next-token top-k, attention per
layer and head, the logit lens, a causal trace and a patching sweep), served by FastAPI + uvicorn, no network."""

from .app import create_lab_app
from .launch import lab

__all__ = ["create_lab_app", "lab"]
