"""GCP Pub/Sub (`gcppubsub://PROJECT/SUBSCRIPTION`): broker over google-cloud-pubsub."""
