"""nitro-cli-compatible emulator for hosts without /dev/nitro_enclaves."""
