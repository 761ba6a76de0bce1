"""Launch configurations (model + cache + scheduler + serving), one ml_collections file each."""
