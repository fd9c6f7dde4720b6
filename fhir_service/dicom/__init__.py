"""Ground floor: DICOMweb access (QIDO/WADO/STOW-RS) and the DICOM result objects we write
(TID 1500 Structured Report, heatmap Segmentations). No Settings, no FHIR: callers pass a
base URL and credentials in, and get pydicom datasets or bytes out."""
