#!/usr/bin/env python3
"""Train RIDE models: ``python train.py --model ride_resnet32_4e --loss ldam_diversity`` (docs/training.md).

Single process, or distributed with ``torchrun --nproc_per_node=N train.py ...``. The logic lives in
``ride_models.training``.
"""

import sys

from ride_models.engine import NonFiniteLossError
from ride_models.training import main

if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, ConnectionError, NonFiniteLossError) as error:  # bad input, NaN
        sys.exit(f"train.py: error: {error}")
