//! Hive cell daemon: PID 1 inside a cell; runs the cell's one build in a container.
