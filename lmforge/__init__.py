"""lmforge: build large language models end to end."""

import os

# How long GNU OpenMP's threads spin for the next parallel region before sleeping: GCC's documented default. The copy
# torch loads drops to 100 spins when it counts more threads than CPUs, and a compiled CPU decode step then waited
# ~120 us a step for its threads to wake. Read when torch loads OpenMP, so set here, before; a user's setting wins.
os.environ.setdefault("GOMP_SPINCOUNT", "300000")
