"""The naive baseline server: Hugging Face ``generate()`` behind the OpenAI API, one request at a time.

    python benchmarks/naive_server.py --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf --port 8001

The app lives in ``ferry.bench.naive_server`` so tests can import it; this script only runs it.
"""

from __future__ import annotations

import sys

from ferry.bench.naive_server import main

if __name__ == "__main__":
    sys.exit(main())
