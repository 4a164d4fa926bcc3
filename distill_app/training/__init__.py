"""Training: configuration, data preparation, schedule, losses, checkpoints and the trainer loop."""

import os

# GNU OpenMP (torch's CPU threads) spins at each of the hundreds of barriers in a step before it
# sleeps. On a CPU shared with anything else (other jobs, DataLoader workers, a second rank) the
# spinning thread burns the time slice the thread it waits for needs: 2 threads on 2 busy cores
# measured 5-10x slower per step than with PASSIVE, which was as fast as 1 thread there. libgomp
# reads this once, when torch loads it, so it only takes effect if nothing imported torch yet
# (the CLI): set here, in the package, because every training module imports torch. The user's
# own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
