"""HieraDet backbone for MMDetection 3.x."""
