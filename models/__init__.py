"""Model layer: weights resolution, preprocessing, one forward pass, CAM, calibration, CLIP.

Knows nothing about FHIR or HTTP.
"""
