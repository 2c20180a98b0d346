//! Hive box daemon: keeps warm cells, runs assigned builds in them, reports back.
