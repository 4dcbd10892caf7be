"""The ELK side of Barber: index templates, ILM, ingest pipelines and Kibana saved objects
(`python -m elk setup`), the Filebeat config, and the analytics indexer used by the ETL."""
