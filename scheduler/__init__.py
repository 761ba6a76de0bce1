"""Policy: SLO tiers, the Preble global router, speculative drafters, the TP controller and the
discrete-event simulator. Never touches device arrays."""
