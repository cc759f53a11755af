# The instance's role: read its own parameters (below ssm_parameter_prefix) and
# decrypt them through SSM with the stack's key; publish to the alerts topic; write the
# containers' log group when enabled; rewrite the token parameters only when
# token_rotation_from_host; Session Manager. Nothing else.

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    effect  = "Allow"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "appliance" {
  name               = "${local.name}-appliance"
  description        = "WebSocket Bridge host: reads its secrets from SSM ${var.ssm_parameter_prefix}"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

locals {
  # ARNs of the parameters: the prefix itself (GetParametersByPath), everything below
  # it, and the token parameters a host-side rotation may rewrite.
  ssm_arn_base = "arn:${data.aws_partition.current.partition}:ssm:${var.aws_region}:${data.aws_caller_identity.current.account_id}:parameter/${local.ssm_path}"
  token_parameter_arns = concat(
    [for name in local.token_names : "${local.ssm_arn_base}/${name}"],
    ["${local.ssm_arn_base}/client_tokens/*"], # scoped client tokens (docs/deploy.md)
  )
}

data "aws_iam_policy_document" "appliance" {
  statement {
    sid    = "ReadOwnParameters"
    effect = "Allow"
    actions = [
      "ssm:GetParameter",
      "ssm:GetParameters",
      "ssm:GetParametersByPath",
    ]
    resources = [local.ssm_arn_base, "${local.ssm_arn_base}/*"]
  }

  statement {
    sid       = "DecryptOwnParametersThroughSsm"
    effect    = "Allow"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.main.arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["ssm.${var.aws_region}.amazonaws.com"]
    }
  }

  # Alertmanager's sns_configs publish with the instance role, to the alerts topic only,
  # which is encrypted with the stack's key.
  statement {
    sid       = "PublishAlerts"
    effect    = "Allow"
    actions   = ["sns:Publish"]
    resources = [aws_sns_topic.alerts.arn]
  }

  statement {
    sid       = "EncryptAlertsThroughSns"
    effect    = "Allow"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = [aws_kms_key.main.arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["sns.${var.aws_region}.amazonaws.com"]
    }
  }

  # Docker's awslogs driver, when container_logs_to_cloudwatch: the containers' group only.
  dynamic "statement" {
    for_each = var.container_logs_to_cloudwatch ? [1] : []

    content {
      sid       = "WriteContainerLogs"
      effect    = "Allow"
      actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
      resources = ["${aws_cloudwatch_log_group.containers[0].arn}:*"]
    }
  }

  # `wsbridge tokens rotate` on the host writes a new version, labels it, and reads
  # the history (SSM keeps 100 versions); only on the token parameters, only when
  # enabled.
  dynamic "statement" {
    for_each = var.token_rotation_from_host ? [1] : []

    content {
      sid    = "RotateTokenParameters"
      effect = "Allow"
      actions = [
        "ssm:PutParameter",
        "ssm:LabelParameterVersion",
        "ssm:UnlabelParameterVersion",
        "ssm:GetParameterHistory",
      ]
      resources = local.token_parameter_arns
    }
  }

  dynamic "statement" {
    for_each = var.token_rotation_from_host ? [1] : []

    content {
      sid       = "EncryptTokenParametersThroughSsm"
      effect    = "Allow"
      actions   = ["kms:Encrypt", "kms:GenerateDataKey"]
      resources = [aws_kms_key.main.arn]

      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["ssm.${var.aws_region}.amazonaws.com"]
      }
    }
  }
}

resource "aws_iam_role_policy" "appliance" {
  name   = "read-wsbridge-secrets"
  role   = aws_iam_role.appliance.id
  policy = data.aws_iam_policy_document.appliance.json
}

# Session Manager: a shell on the host without SSH, for when SSH is locked out (the
# playbook itself needs SSH: docs/deploy.md).
resource "aws_iam_role_policy_attachment" "session_manager" {
  role       = aws_iam_role.appliance.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "appliance" {
  name = "${local.name}-appliance"
  role = aws_iam_role.appliance.name
}

# --- Flow logs writer ---------------------------------------------------------------------

data "aws_iam_policy_document" "flow_logs_assume" {
  statement {
    effect  = "Allow"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["vpc-flow-logs.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
  }
}

# The permissions AWS documents for a flow-log role (VPC user guide, "IAM role for
# publishing flow logs to CloudWatch Logs"), scoped to the stack's log group.
data "aws_iam_policy_document" "flow_logs_write" {
  statement {
    effect = "Allow"
    actions = [
      "logs:CreateLogGroup",
      "logs:CreateLogStream",
      "logs:PutLogEvents",
      "logs:DescribeLogGroups",
      "logs:DescribeLogStreams",
    ]
    resources = [aws_cloudwatch_log_group.flow_logs.arn, "${aws_cloudwatch_log_group.flow_logs.arn}:*"]
  }
}
