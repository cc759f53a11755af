# Where alerts go: an SNS topic with the operators' e-mail subscriptions (alert_emails,
# required). Alertmanager publishes to it with the instance role (sns_configs, from
# ALERTS_SNS_TOPIC_ARN that Ansible passes to the stack); CloudWatch publishes to it
# when the host itself is in trouble, which nothing on the host can report.

resource "aws_sns_topic" "alerts" {
  name              = "${local.name}-alerts"
  display_name      = "WebSocket Bridge ${var.environment} alerts"
  kms_master_key_id = aws_kms_key.main.arn
}

# AWS mails each address a confirmation link; nothing is delivered before it is clicked.
resource "aws_sns_topic_subscription" "alerts_email" {
  for_each = toset(var.alert_emails)

  topic_arn = aws_sns_topic.alerts.arn
  protocol  = "email"
  endpoint  = each.value
}

# --- Checks that do not run on the host ----------------------------------------------------

# The instance or its hardware fails EC2's status checks: a dead, frozen or unreachable
# host, whose own Prometheus can say nothing.
resource "aws_cloudwatch_metric_alarm" "instance_status" {
  for_each = {
    instance = "StatusCheckFailed_Instance"
    system   = "StatusCheckFailed_System"
  }

  alarm_name          = "${local.name}-${each.key}-status-check"
  alarm_description   = "EC2 ${each.key} status check of the WebSocket Bridge host failed for 3 minutes (docs/deploy.md, When the host is down)."
  namespace           = "AWS/EC2"
  metric_name         = each.value
  # Several hosts: the group's instances, aggregated (detailed monitoring, launch template).
  dimensions = (
    local.multi_host
    ? { AutoScalingGroupName = aws_autoscaling_group.appliance[0].name }
    : { InstanceId = aws_instance.appliance[0].id }
  )
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 3
  threshold           = 1
  comparison_operator = "GreaterThanOrEqualToThreshold"
  # No data is a host that stopped reporting: as bad as a failed check.
  treat_missing_data = "breaching"
  alarm_actions      = [aws_sns_topic.alerts.arn]
  ok_actions         = [aws_sns_topic.alerts.arn]
}

# The public WebSocket endpoint, from Route 53's checkers around the world: TLS on 443
# of the domain (Traefik answers, the DNS record points at the host). Route 53 publishes
# health-check metrics in us-east-1 only, so its alarm and topic live there
# (provider aws.us_east_1, versions.tf).
resource "aws_route53_health_check" "wss" {
  fqdn              = var.domain_name
  port              = 443
  type              = "TCP"
  request_interval  = 30
  failure_threshold = 3

  tags = { Name = "${local.name}-wss" }
}

resource "aws_sns_topic" "endpoint_alerts" {
  #checkov:skip=CKV_AWS_26:Carries only CloudWatch alarm state changes of the public endpoint, no secret; a customer key would have to be a second key in us-east-1.
  provider     = aws.us_east_1
  name         = "${local.name}-endpoint-alerts"
  display_name = "WebSocket Bridge ${var.environment} endpoint"
}

resource "aws_sns_topic_subscription" "endpoint_email" {
  for_each = toset(var.alert_emails)
  provider = aws.us_east_1

  topic_arn = aws_sns_topic.endpoint_alerts.arn
  protocol  = "email"
  endpoint  = each.value
}

resource "aws_cloudwatch_metric_alarm" "wss_endpoint" {
  provider = aws.us_east_1

  alarm_name          = "${local.name}-wss-endpoint"
  alarm_description   = "wss://${var.domain_name} refused Route 53's checkers for 3 minutes (docs/deploy.md, When the host is down)."
  namespace           = "AWS/Route53"
  metric_name         = "HealthCheckStatus"
  dimensions          = { HealthCheckId = aws_route53_health_check.wss.id }
  statistic           = "Minimum"
  period              = 60
  evaluation_periods  = 3
  threshold           = 1
  comparison_operator = "LessThanThreshold"
  treat_missing_data  = "breaching"
  alarm_actions       = [aws_sns_topic.endpoint_alerts.arn]
  ok_actions          = [aws_sns_topic.endpoint_alerts.arn]
}
