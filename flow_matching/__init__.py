"""Class-conditional flow matching with a DiT in pixel space (see README and configs/flow_matching)."""
