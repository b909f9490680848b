"""Tensor parallelism: how a Llama model is split across ranks (`sharding.py`), the parallel layers
(`layers.py`), the process group and its worker processes (`group.py`), what rank 0 sends the
others each step (`protocol.py`) and the loop ranks 1..N-1 run (`worker.py`)."""
