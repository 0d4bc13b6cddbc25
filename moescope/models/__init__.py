"""Every architecture fact in one place: router families (one file each, found through `registry`),
expert layouts in memory and on disk and config key names (`layout`), reading a checkpoint's MoE
structure from its headers (`inspection`), and tiny random models of each architecture (`tiny`).

A new architecture is one line in its family's `model_types`; a new routing rule, one file here."""
