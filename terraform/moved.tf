# host_count made the single host's resources counted: the existing state moves to index
# 0, so a stack deployed before keeps its host, address and data volume untouched.

moved {
  from = aws_instance.appliance
  to   = aws_instance.appliance[0]
}

moved {
  from = aws_eip.appliance
  to   = aws_eip.appliance[0]
}

moved {
  from = aws_ebs_volume.data
  to   = aws_ebs_volume.data[0]
}

moved {
  from = aws_volume_attachment.data
  to   = aws_volume_attachment.data[0]
}
