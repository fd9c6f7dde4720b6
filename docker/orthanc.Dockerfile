# The PACS of the production shape: Debian's Orthanc and its DICOMweb plugin, the very packages
# `make pacs` installs for the embedded one. Storage in the orthanc volume; basic auth from the
# environment (Orthanc expands ${VAR} in its configuration).
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends orthanc orthanc-dicomweb \
 && rm -rf /var/lib/apt/lists/*
COPY docker/orthanc.json /etc/cxr/orthanc.json
EXPOSE 8042
CMD ["/usr/sbin/Orthanc", "/etc/cxr/orthanc.json"]
