"""Physics-based synthetic breast DCE-MRI DICOM cohort (`iap-synth`).

phantom: seeded 3D anatomy; tissues: relaxation and contrast uptake; scanners: the
protocol catalog; acquisition: signal equation, k-space sampling and reconstruction;
dicom_writer: vendor headers and files; cohort: patients -> series and cohort.csv;
contact_sheet: PNG overview; cli: the command line.
"""
