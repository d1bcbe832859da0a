"""The cache's object store on an S3-compatible service (AWS S3, GCS's interoperable API,
Ceph RGW, MinIO, R2): the location and credentials (``settings``), a streaming client on
treq (``client``), multipart uploads fed as a download arrives (``multipart``)."""
