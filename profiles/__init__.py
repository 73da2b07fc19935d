"""edgesplit.profiles: typed figures of devices, network links and cloud workers.

Strict TOML (`toml_fields`: unknown or missing fields and wrong units are refused with the file
and field) loaded into frozen dataclasses (`device`, `network`, `cloud`); each figure has its unit
in its name and its source (measured, datasheet or estimate) in the file. The built-in profiles
are the TOML files in `devices/`, `networks/` and `clouds/`.
"""
