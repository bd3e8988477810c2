"""Local AWS endpoint: moto server plus the behaviour moto lacks (attested KMS, EC2 enclave options)."""
