"""p4seg's command line and, later, its service: the layer that wires the verbs of
compiler/ (policy -> tables), runtime/ (P4Runtime controller, reference switch) and
topologies/ (Mininet floors). Nothing below imports it."""
