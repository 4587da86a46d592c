"""Test set-up shared by every tier.

The data sets the tests read ship inside the package (megatron_dapo/data/catalog.py): nothing here reads
outside the repository. The test session runs as one job does under launch/common.sh: one rollout API key in
DAPO_API_KEY, which the servers the tests launch, the clients, and the processes they spawn (training ranks,
workers) all read.
"""

import os

from megatron_dapo.rollout.api_key import API_KEY_ENV, new_api_key

os.environ.setdefault(API_KEY_ENV, new_api_key())
