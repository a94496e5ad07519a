"""Ray Data preprocessing: raw GRIB/NetCDF archives to regridded Parquet tensor shards.

This package imports no torch.
"""
