# The Network Load Balancer in front of the group (host_count >= 2).
#
# TLS ends at the load balancer with an ACM certificate, re-encrypted to Traefik on each
# host (docs/deploy.md, Several hosts, says why): Let's Encrypt's HTTP-01 and TLS-ALPN-01
# challenges reach whichever host the load balancer picks, so with several hosts behind
# one name a host's challenge would mostly be answered by another host; ACM renews by
# itself and every host stays identical. The load balancer does not verify the targets'
# certificates, so Traefik's own certificate on each host needs no public name.

resource "aws_acm_certificate" "bridge" {
  count = local.multi_host ? 1 : 0

  domain_name       = var.domain_name
  validation_method = "DNS"

  lifecycle {
    create_before_destroy = true
  }
}

# Waits until the certificate is issued: create the CNAME of acm_validation_records
# (outputs) while the apply waits.
resource "aws_acm_certificate_validation" "bridge" {
  count = local.multi_host ? 1 : 0

  certificate_arn = aws_acm_certificate.bridge[0].arn
}

resource "aws_lb" "appliance" {
  #checkov:skip=CKV_AWS_91:Connection logs of a network load balancer cover TLS listeners only and need a log bucket of their own; the VPC flow logs (main.tf) already record every connection.
  count = local.multi_host ? 1 : 0

  name                             = "${local.name}-nlb"
  load_balancer_type               = "network"
  internal                         = false
  subnets                          = [aws_subnet.public.id, aws_subnet.public_b[0].id]
  enable_cross_zone_load_balancing = true
  enable_deletion_protection       = true
}

locals {
  # Listener port => what it carries. 80 only redirects (Traefik); 443 and 8443 end TLS here.
  nlb_ports = local.multi_host ? { http = 80, wss = 443, admin = 8443 } : {}
}

resource "aws_lb_target_group" "appliance" {
  for_each = local.nlb_ports

  name        = "${local.name}-${each.key}"
  port        = each.value
  protocol    = each.key == "http" ? "TCP" : "TLS"
  target_type = "instance"
  vpc_id      = aws_vpc.main.id
  # Clients' addresses reach Traefik as they are: the security group's 8443 rule
  # (admin_allowed_cidrs) still applies, and presence shows the real address.
  preserve_client_ip = true
  # A host leaving the group (scale-in, replacement) gets this long to let its
  # WebSockets go; the rolling upgrade drains them itself (docs/deploy.md).
  deregistration_delay = 30

  # TCP: Traefik answers a health path only for the bridge's Host, which the load
  # balancer's checks do not send; a host that is not provisioned yet fails this too.
  health_check {
    protocol            = "TCP"
    port                = "traffic-port"
    interval            = 10
    healthy_threshold   = 3
    unhealthy_threshold = 3
  }
}

resource "aws_lb_listener" "appliance" {
  for_each = local.nlb_ports

  load_balancer_arn = aws_lb.appliance[0].arn
  port              = each.value
  protocol          = each.key == "http" ? "TCP" : "TLS"
  certificate_arn   = each.key == "http" ? null : aws_acm_certificate_validation.bridge[0].certificate_arn
  ssl_policy        = each.key == "http" ? null : "ELBSecurityPolicy-TLS13-1-2-2021-06"
  alpn_policy       = each.key == "http" ? null : "HTTP1Only"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.appliance[each.key].arn
  }
}

# The load balancer's health checks come from its own addresses inside the VPC.
resource "aws_vpc_security_group_ingress_rule" "load_balancer_health" {
  for_each = local.nlb_ports

  security_group_id = aws_security_group.appliance.id
  description       = "Load balancer health checks on ${each.key}"
  ip_protocol       = "tcp"
  from_port         = each.value
  to_port           = each.value
  cidr_ipv4         = var.vpc_cidr
}
