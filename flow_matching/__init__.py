"""Class-conditional flow matching with a DiT in pixel space.

dit.py (the network), path.py (straight path, time sampling, label dropout), sampling.py (time
grids, Euler and Heun, classifier-free guidance), task.py (loss, evaluation and sample grids for
shared.trainer), config.py (the run config), load.py and generate.py (for the scripts).
"""
