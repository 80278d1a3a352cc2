"""The testbed: unequal emulated devices on one machine (cgroup v1 CPU quota and memory
limit, a network namespace with a shaped veth link and a delay relay each), serving with
the real runtime, to measure planning methods and the simulator against reality.
See `bed` for the layout, `run` for the experiment, `inventory` for the device format."""
